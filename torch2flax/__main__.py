from torch2flax.cli import main

raise SystemExit(main())
