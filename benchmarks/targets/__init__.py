"""Where `mobilevlm bench` runs a bundle's contenders.

- `host`: this machine, each contender in a fresh subprocess of this Python (benchmarks/runner.py).
- `emulator`: the same worker inside an ARM64 user-mode emulator (qemu-aarch64-static) with an aarch64
  Python sysroot and aarch64 wheels (emulator.py); proves the ARM kernels run our artifacts and give the
  host's tokens. Its times are emulated, never phone times.
- `adb`: a connected Android device, through the demo app's benchmark mode or a runner binary (adb.py).
"""

TARGETS = ("host", "emulator", "adb")
