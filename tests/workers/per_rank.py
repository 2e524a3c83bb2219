"""Run another script with '{rank}' in its arguments replaced by this process's RANK."""
import os
import runpy
import sys

script, *args = sys.argv[1:]
sys.argv = [script] + [a.replace("{rank}", os.environ.get("RANK", "0")) for a in args]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
runpy.run_path(script, run_name="__main__")
