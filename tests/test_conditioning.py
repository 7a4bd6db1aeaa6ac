"""comfy_rapm.conditioning without the host: one-prompt CONDITIONINGs batched row by row."""
import pytest
import torch

from comfy_rapm import conditioning


def test_stack_pads_tokens_to_their_least_common_multiple_and_batches_the_extras():
    a = [[torch.ones(1, 2, 4), {"pooled_output": torch.zeros(1, 3), "width": 512}]]
    b = [[torch.arange(12.0).reshape(1, 3, 4), {"pooled_output": torch.ones(1, 3), "width": 512}]]
    (tensor, extra), = conditioning.stack([a, b])
    assert tensor.shape == (2, 6, 4)
    assert torch.equal(tensor[0], torch.ones(6, 4)) and torch.equal(tensor[1], b[0][0][0].repeat(2, 1))
    assert torch.equal(extra["pooled_output"], torch.tensor([[0.0] * 3, [1.0] * 3])) and extra["width"] == 512


def test_stack_refuses_what_it_cannot_batch():
    a = [[torch.ones(1, 2, 4), {"width": 512}]]
    with pytest.raises(ValueError, match="differ in 'width'"):
        conditioning.stack([a, [[torch.ones(1, 2, 4), {"width": 768}]]], "prompts")
    with pytest.raises(ValueError, match="one conditioning entry"):
        conditioning.stack([a + a])
