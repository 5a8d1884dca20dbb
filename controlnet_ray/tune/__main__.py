"""``python -m controlnet_ray.tune``."""

import sys

from controlnet_ray.tune.command_line import main

sys.exit(main())
