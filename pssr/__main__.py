from pssr.cli import main

raise SystemExit(main())
