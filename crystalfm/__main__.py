from crystalfm.cli import main

raise SystemExit(main())
