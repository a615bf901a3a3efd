"""`python -m editx_jax.parity [DIR ...]`: the parity gate (see editx_jax/parity/gate.py)."""

import sys

from editx_jax.parity.gate import main

sys.exit(main())
