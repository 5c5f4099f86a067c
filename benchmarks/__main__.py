"""python -m benchmarks NAME [options]: as `grpo bench`."""
import sys

from benchmarks.cli import main

sys.exit(main())
