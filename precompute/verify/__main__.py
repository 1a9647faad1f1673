"""`python -m precompute.verify`: see the package docstring."""

import sys

from precompute.verify import main

sys.exit(main())
