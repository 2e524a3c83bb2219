"""Run a command with a file-size limit: writes past LIMIT bytes fail with EFBIG, as on a full
disk (Python ignores SIGXFSZ, so the write raises instead of killing the process).

    python tests/workers/ckpt_fsize.py LIMIT python -m gan_dist.train ...
"""
import os
import resource
import sys

limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
os.execvp(sys.argv[2], sys.argv[2:])
