"""XLA settings qbound relies on, applied before JAX creates its CPU backend.

Sound-mode bound propagation is made of long chains of small elementwise operations. XLA's newer
CPU fusion emitters compile such chains several times slower than the older ones (measured: 17 s
against 9 s for the differential bounds of a 48-node network cold, the same run time warm), so
qbound asks for the older ones with ``--xla_cpu_use_fusion_emitters=false``. The flag only
concerns CPU code generation; GPU and TPU backends ignore it. It is added to ``XLA_FLAGS`` at
import unless that variable already mentions it or ``QBOUND_KEEP_XLA_FLAGS`` is set, and has no
effect if JAX's CPU backend was created before qbound was imported.
"""

import os

FLAG = "--xla_cpu_use_fusion_emitters=false"


def apply() -> None:
  flags = os.environ.get("XLA_FLAGS", "")
  if os.environ.get("QBOUND_KEEP_XLA_FLAGS") or "xla_cpu_use_fusion_emitters" in flags:
    return
  os.environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
