"""`python -m precompute.knn_transformers`: see the package docstring."""

import sys

from precompute.knn_transformers import main

sys.exit(main())
