"""Certify many boxes on several hosts at once with ``jax.distributed`` (runnable).

Every process runs this same script. After ``jax.distributed.initialize()``, ``jax.devices()`` lists the
devices of every host, and ``qb.certify_batch`` (whose default mesh is all of them) splits each chunk of
boxes over all of them; every process gets every certificate back. The networks and the boxes must be the
same on every host (here they are the bundled digits MLP and its test images; in your own script, load the
same files or use the same seeds).

    # simulated on this machine: 2 processes with 4 CPU devices each (8 devices in all)
    python examples/multi_host.py --simulate 2

    # by hand, one process per host (HOST0 reachable from every host):
    python examples/multi_host.py --coordinator HOST0:12345 --num-processes 2 --process-id 0   # on HOST0
    python examples/multi_host.py --coordinator HOST0:12345 --num-processes 2 --process-id 1   # on HOST1

    # under SLURM or on a Cloud TPU pod, jax.distributed.initialize() finds all of this itself:
    python examples/multi_host.py --auto

It checks that the certificates equal those of one process on its own devices (``--check``, on by default
in ``--simulate``).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys


def certify(args):
  import functools

  import jax
  import numpy as np

  if args.auto:
    jax.distributed.initialize()
  elif args.coordinator:
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)
  import qbound as qb
  from qbound.demo import load_digits_images, load_digits_model

  apply, params = load_digits_model()
  images, _ = load_digits_images()
  f = functools.partial(apply, params)
  fq = functools.partial(apply, dict(params, params=qb.quantize.uniform(params["params"], bits=8)))
  centres = np.tile(images, (args.repeat, 1))  # 20 bundled images, repeated
  boxes = qb.linf_ball(centres, 0.02, clip_lower=0.0, clip_upper=1.0)

  batch = qb.certify_batch(f, fq, boxes, method=args.method, key=jax.random.key(0), progress=False)
  spread = np.bincount(batch.layout["device_of_box"], minlength=len(jax.devices()))
  if jax.process_index() == 0:
    print(f"process {jax.process_index()} of {jax.process_count()}: {len(jax.devices())} devices in all "
          f"({len(jax.local_devices())} here); {len(batch)} boxes, chunks of {batch.layout['chunk']}, "
          f"boxes per device {spread.tolist()}")
    print(batch)
  if args.save:
    np.savez(args.save, upper=batch.upper, lower=batch.lower)
  return batch


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def simulate(args) -> int:
  """Starts ``args.simulate`` processes of this script on this machine, 4 CPU devices each."""
  import tempfile

  import numpy as np

  port = free_port()
  tmp = tempfile.mkdtemp()
  procs = []
  for i in range(args.simulate):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    cmd = [sys.executable, __file__, "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(args.simulate),
           "--process-id", str(i), "--method", args.method, "--repeat", str(args.repeat),
           "--save", os.path.join(tmp, f"p{i}.npz")]
    procs.append(subprocess.Popen(cmd, env=env))
  codes = [p.wait() for p in procs]
  if any(codes):
    print(f"a process failed: exit codes {codes}")
    return 1
  results = [np.load(os.path.join(tmp, f"p{i}.npz")) for i in range(args.simulate)]
  if args.check:
    # The same certificates from one process on its own (single-device) CPU.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    cmd = [sys.executable, __file__, "--method", args.method, "--repeat", str(args.repeat),
           "--save", os.path.join(tmp, "single.npz")]
    subprocess.run(cmd, env=env, check=True)
    single = np.load(os.path.join(tmp, "single.npz"))
    for r in results:
      np.testing.assert_allclose(r["upper"], single["upper"], rtol=1e-6)
      np.testing.assert_allclose(r["lower"], single["lower"], rtol=1e-5)
    print(f"check: all {args.simulate} processes hold the certificates one process computes alone")
  return 0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--simulate", type=int, default=0, help="start this many local processes (4 CPU devices each)")
  p.add_argument("--coordinator", help="HOST:PORT of process 0")
  p.add_argument("--num-processes", type=int, default=1)
  p.add_argument("--process-id", type=int, default=0)
  p.add_argument("--auto", action="store_true", help="jax.distributed.initialize() with no arguments (SLURM, TPU pods)")
  p.add_argument("--method", default="crown")
  p.add_argument("--repeat", type=int, default=4, help="how many times to repeat the 20 bundled images")
  p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                 help="with --simulate, compare with one process alone")
  p.add_argument("--save", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.simulate:
    return simulate(args)
  certify(args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
