"""`python -m looplm.kernels`: compile the C++ CPU kernels now (scripts/setup.sh runs this)."""

from looplm.kernels.extension import main

raise SystemExit(main())
