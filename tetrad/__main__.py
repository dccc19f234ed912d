import atexit
import os
import sys
import threading

from tetrad.cli import main

code = main()
# Finish the way the interpreter would -- join non-daemon threads, run exit handlers, flush --
# then leave without C-level teardown. torch's distributed backends can still hold a joinable
# std::thread when their static destructors run, which aborts an otherwise finished run
# ("terminate called without an active exception", seen under torchrun and mpiexec even after
# destroy_process_group). Everything tetrad writes is closed and fsynced before this point.
getattr(threading, "_shutdown", lambda: None)()
atexit._run_exitfuncs()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code if isinstance(code, int) else 1)
