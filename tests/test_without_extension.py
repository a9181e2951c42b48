"""Without the compiled extension the package imports, says so, and works on the torch backend."""
from __future__ import annotations

import subprocess
import sys
import textwrap


def test_package_works_without_native_extension():
    script = textwrap.dedent("""
        import sys
        sys.modules["engm_fast._C"] = None   # as if the extension had not been built
        import torch, torch.nn.functional as F
        import engm_fast
        assert "cpu" not in engm_fast.available_backends(), engm_fast.available_backends()
        assert engm_fast.available_backends()[0] == "torch"
        assert "engm_fast._C" in engm_fast.native_import_error()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(18, 3))
        opt = engm_fast.ENGM(model, lr=0.1, momentum=0.9)
        x, y = torch.randn(4, 1, 5, 5), torch.randint(0, 3, (4,))
        norms = opt.backward(F.cross_entropy(model(x), y, reduction="none"))
        opt.step()
        assert norms.shape == (4,) and torch.isfinite(norms).all()
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
