"""Force JAX onto the CPU with 8 fake devices before anything imports jax."""
import os
import sys

# torch._dynamo (imported by torchvision and timm) imports triton, whose shared library
# segfaults when loaded after TensorFlow's in one process; CPU tests never need triton.
sys.modules.setdefault("triton", None)

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# tf.data must never grab an accelerator in tests.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
