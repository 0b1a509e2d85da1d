from mmkernels.experiments.cli import main

raise SystemExit(main())
