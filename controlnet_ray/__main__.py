"""``python -m controlnet_ray`` is the training command."""

import sys

from controlnet_ray.train import main

sys.exit(main())
