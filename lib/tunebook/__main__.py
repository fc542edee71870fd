from tunebook.cli import main

raise SystemExit(main())
