"""What test modules share: the reference notes' network, a driver around a real shell, the in-process
kernel, and the CUDA skip mark. conftest.py holds fixtures alone (a test module never imports a conftest:
two conftests are both modules named `conftest`, and an import would get whichever came last)."""
from __future__ import annotations

import pytest
import torch
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

NET_SOURCE = '''
import torch
import torch.nn as nn
import torch.nn.functional as F

class Net(nn.Module):
    def __init__(self):
        super(Net, self).__init__()
        self.conv1 = nn.Conv2d(1, 6, 3)
        self.fc1 = nn.Linear(1350, 10)

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu(x)
        x = F.max_pool2d(x, (2, 2))
        x = F.relu(x)
        x = x.view(x.size()[0], -1)
        x = self.fc1(x)
        return x

torch.manual_seed(0)
net = Net()
input = torch.randn(1, 1, 32, 32)
y = torch.arange(0, 10).view(1, 10).float()
criterion = nn.MSELoss()
optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
'''


class Shell:
    """A thin test driver around a real InteractiveShell."""

    def __init__(self, ip: InteractiveShell):
        self.ip = ip
        self.ns = ip.user_ns

    def run(self, code: str):
        """Run a cell; fail the test on any error; return the cell's result value."""
        result = self.ip.run_cell(code, store_history=True)
        if not result.success:
            err = result.error_in_exec or result.error_before_exec
            raise AssertionError(f"cell failed: {type(err).__name__}: {err}\n{code}")
        return result.result

    def usage_error(self, code: str) -> str:
        """Run a cell that must fail with exactly a UsageError; return its one-line message."""
        result = self.ip.run_cell(code, store_history=True)
        err = result.error_in_exec or result.error_before_exec
        assert type(err) is UsageError, f"expected UsageError, got {type(err).__name__}: {err}"
        message = str(err)
        assert "\n" not in message, message
        return message

    def error(self, code: str) -> BaseException:
        """Run a cell that must fail; return the exception the user sees."""
        result = self.ip.run_cell(code, store_history=True)
        err = result.error_in_exec or result.error_before_exec
        assert err is not None, "the cell did not fail"
        return err

    def html(self, value) -> str:
        data, _ = self.ip.display_formatter.format(value)
        return data["text/html"]

    def text(self, value) -> str:
        data, _ = self.ip.display_formatter.format(value)
        return data["text/plain"]


def start_inprocess_kernel():
    """A real in-process ipykernel that has answered one request through its client, so it has a
    parent message as in a notebook: ipywidgets' Output routes displays by it (ipywidgets 7 reads
    it directly and fails without one)."""
    from ipykernel.inprocess.manager import InProcessKernelManager

    manager = InProcessKernelManager()
    manager.start_kernel()
    client = manager.client()
    client.start_channels()
    client.execute("pass")
    client.get_shell_msg(timeout=30)
    return manager


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
