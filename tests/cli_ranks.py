"""Run an evaluation CLI (`python -m MODULE`) as `world` gloo processes, as torchrun would."""
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli_ranks(module: str, args, world: int = 2, timeout: float = 120) -> str:
    """Rank 0's stdout; every rank must exit 0 and only rank 0 may print."""
    env = dict(os.environ, WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    procs = [subprocess.Popen([sys.executable, "-m", module, *args], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, err
        outs.append(out)
    assert all(o == "" for o in outs[1:]), outs[1:]  # only rank 0 reports
    return outs[0]
