"""Entry point: `python -m trainer` (see trainer.cli)."""

import sys
import warnings

from trainer.cli import main

# Library deprecation notices (transformers, peft) are for this project's developers, not for
# the admin watching a retrain: they stay out of stderr, which the bot relays.
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

if __name__ == "__main__":
    sys.exit(main())
