"""``python -m timm_exits.hub push CHECKPOINT --model NAME ...``: publish a checkpoint (see ``timm_exits.hub``)."""
import sys

from . import main

sys.exit(main())
