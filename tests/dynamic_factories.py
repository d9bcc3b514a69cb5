"""A factory file for `kiln build path/to/file.py:factory` in the dynamic-shape CLI tests."""

# tokens(): integer inputs with a batch and a sequence axis; image(): an image net
FACTORY = '''
import torch
from torch import nn


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, input_ids, attention_mask):
        return self.head(self.emb(input_ids) * attention_mask.unsqueeze(-1).float()).mean(1)


def tokens():
    torch.manual_seed(0)
    return Tokens().eval(), (torch.randint(0, 50, (2, 10)), torch.ones(2, 10, dtype=torch.long))


def image():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
'''
