import copy

import pytest
import torch

import tdconv

@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("k, s, p, d", [(3, 1, 1, 1), (3, 2, 1, 1), (5, 1, 2, 1), (3, 1, 2, 2), (7, 2, 3, 1),
                                        (3, 3, 2, 1), (1, 1, 0, 1), (3, 1, 0, 1)])
def test_live_tap_conv_equals_conv(n, k, s, p, d):
    from tdconv.nn import LiveTapConv2d
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, k, s, p, d, bias=True).double()
    if (n + 2 * p - d * (k - 1) - 1) // s + 1 <= 0:
        pytest.skip("empty output")
    live = copy.deepcopy(conv)
    live.__class__ = LiveTapConv2d
    x = torch.randn(2, 4, n, n + 1, dtype=torch.float64, requires_grad=True)
    y, y_live = conv(x), live(x)
    torch.testing.assert_close(y_live, y)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, conv.weight, conv.bias), g)
    grads_live = torch.autograd.grad(y_live, (x, live.weight, live.bias), g)
    for a, b in zip(grads_live, grads):
        torch.testing.assert_close(a, b)


def test_skip_padding_taps_on_a_model():
    import torchvision
    from tdconv.compress import count_complexity
    from tdconv.nn.live_taps import _live_window
    assert _live_window(1, 3, 1, 1, 1) == (1, 1, 0)  # 3x3 on a 1x1 map: the centre tap, no padding
    assert _live_window(2, 3, 2, 1, 1) == (1, 2, 0)  # 3x3 stride 2 on a 2x2 map: taps 1 and 2
    assert _live_window(8, 3, 1, 1, 1) is None
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    small, _ = tdconv.compress(model, "tucker", 0.5, layers="seed", progress=False, n_iter_max=5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = small(x)
        counts = count_complexity(small)
        keys = list(small.state_dict())
        tdconv.skip_padding_taps(small)
        assert type(small.layer4[0].conv1) is tdconv.LiveTapConv2d and small.layer4[1].conv2.skip_padding_taps
        torch.testing.assert_close(small(x), before, rtol=1e-4, atol=1e-4)
        assert count_complexity(small) == counts and list(small.state_dict()) == keys
        tdconv.skip_padding_taps(small, False)
        assert type(small.layer4[0].conv1) is torch.nn.Conv2d and not small.layer4[1].conv2.skip_padding_taps
