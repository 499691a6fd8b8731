from pretrain.cli import main

raise SystemExit(main())
