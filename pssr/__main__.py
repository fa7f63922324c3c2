from pssr.cli.app import main

raise SystemExit(main())
