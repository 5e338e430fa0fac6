from kdfast.bench.cli import main

raise SystemExit(main())
