from dpalogic.cli import main

raise SystemExit(main())
