from cxrlab.cli import main

raise SystemExit(main())
