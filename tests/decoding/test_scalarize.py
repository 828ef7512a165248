import pytest
import torch

from moalign.decoding.scalarize import parse_scalarization
from moalign.errors import MoalignError

NAMES = ["helpful", "harmless"]


def test_parse_and_apply():
    v = torch.tensor([[1.0, -2.0], [0.5, 0.5]])
    assert torch.allclose(parse_scalarization("uniform", NAMES)(v), torch.tensor([-0.5, 0.5]))
    assert torch.allclose(parse_scalarization("worst-case", NAMES)(v), torch.tensor([-2.0, 0.5]))
    assert torch.allclose(parse_scalarization("harmless", NAMES)(v), torch.tensor([-2.0, 0.5]))
    s = parse_scalarization("helpful=3,harmless=1", NAMES)
    assert s.weights == (0.75, 0.25)
    assert torch.allclose(s(v), torch.tensor([0.25, 0.5]))


@pytest.mark.parametrize("bad", ["honest", "helpful=x", "honest=1", "helpful=-1", "helpful=0,harmless=0"])
def test_bad_specs(bad):
    with pytest.raises(MoalignError):
        parse_scalarization(bad, NAMES)
