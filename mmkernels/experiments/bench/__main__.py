"""python -m mmkernels.experiments.bench (= mmkernels bench): the benchmark suites (see .cli)."""

from mmkernels.experiments.bench.cli import main

raise SystemExit(main())
