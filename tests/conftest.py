import os
import sys

# Spawned ranks and this process alike: one thread each, so N ranks share 2 cores fairly.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))
