"""DSAE shapes/options and the projection P."""

import pytest
import torch

from sdml_ext.model import DSAE, make_projection, tensor_checksum


def test_dsae_shapes_and_layers():
    model = DSAE(40, code_dim=16, hidden=(32, 24))
    linears = [m for m in model.encoder if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(40, 32), (32, 24), (24, 16)]
    decoder = [m for m in model.decoder if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in decoder] == [(16, 24), (24, 32), (32, 40)]
    # ReLU after hidden layers only: the code and the output layers are linear.
    assert isinstance(model.encoder[-1], torch.nn.Linear) and isinstance(model.decoder[-1], torch.nn.Linear)
    assert sum(isinstance(m, torch.nn.ReLU) for m in model.encoder) == 2
    h, x_hat = model(torch.randn(5, 40))
    assert h.shape == (5, 16) and x_hat.shape == (5, 40)


def test_default_architecture_is_the_papers():
    model = DSAE(100)
    assert model.code_dim == 512 and model.hidden == (1024, 1024)


@pytest.mark.parametrize("normalize_code,normalize_output", [(True, True), (False, False), (True, False)])
def test_normalization_options(normalize_code, normalize_output):
    torch.manual_seed(0)
    model = DSAE(12, code_dim=8, hidden=(16, 16), normalize_code=normalize_code, normalize_output=normalize_output)
    h, x_hat = model(torch.randn(6, 12) * 10)
    assert torch.allclose(h.norm(dim=1), torch.ones(6), atol=1e-5) == normalize_code
    assert torch.allclose(x_hat.norm(dim=1), torch.ones(6), atol=1e-5) == normalize_output
    assert DSAE(**model.options()).options() == model.options()


def test_encode_rejects_wrong_width():
    with pytest.raises(ValueError, match=r"\[B, 12\]"):
        DSAE(12, code_dim=8, hidden=(16,)).encode(torch.randn(3, 13))


def test_projection_is_orthonormal_and_seeded():
    P = make_projection(64, 10, seed=3)
    assert P.shape == (64, 10) and P.dtype == torch.float32
    assert torch.allclose(P.T @ P, torch.eye(10), atol=1e-5)
    assert tensor_checksum(P) == tensor_checksum(make_projection(64, 10, seed=3))
    assert tensor_checksum(P) != tensor_checksum(make_projection(64, 10, seed=4))
    assert torch.allclose(make_projection(10, 10, 0).T @ make_projection(10, 10, 0), torch.eye(10), atol=1e-5)


def test_projection_needs_c_at_most_d():
    with pytest.raises(ValueError, match="exceeds the code width"):
        make_projection(8, 9, seed=0)
