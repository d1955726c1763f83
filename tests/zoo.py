"""Hand-written models for the shape tests and bench/shapes.py (torchvision does not import here).
Each builder takes its sizes, so tests use small ones and the benchmark the real ones."""
from __future__ import annotations

import collections
import dataclasses
import itertools

import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    """The reference notes' network."""

    def __init__(self, fc_in: int = 1350):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3)
        self.fc1 = nn.Linear(fc_in, 10)

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu(x)
        x = F.max_pool2d(x, (2, 2))
        x = F.relu(x)
        x = x.view(x.size()[0], -1)
        x = self.fc1(x)
        return x


def mlp(sizes=(20, 64, 32, 5)) -> nn.Module:
    layers = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.flatten = nn.Flatten()
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        return self.head(self.flatten(self.features(x)))


class Bottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet-50's layout (25.6 M parameters with the defaults), written like torchvision's."""

    def __init__(self, blocks=(3, 4, 6, 3), width=64, classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes, stages = width, []
        for i, n in enumerate(blocks):
            planes = width * 2**i
            layer = [Bottleneck(inplanes, planes, 1 if i == 0 else 2)]
            layer += [Bottleneck(planes * 4, planes) for _ in range(n - 1)]
            inplanes = planes * 4
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50() -> ResNet:
    return ResNet()


# ---------------------------------------------------------------- decoders


class GPTBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d)
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2's layout (124 M parameters with the defaults); the head is tied to the token embedding."""

    def __init__(self, vocab=50257, ctx=1024, d=768, layers=12, heads=12):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.h = nn.ModuleList(GPTBlock(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.wte(ids) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class LlamaAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        hd = d // self.heads
        q, k, v = (p(x).view(b, t, self.heads, hd).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        freqs = 1.0 / (10000 ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd))
        angles = torch.outer(torch.arange(t, device=x.device, dtype=torch.float32), freqs)
        cos, sin = angles.cos().repeat(1, 2).to(x.dtype), angles.sin().repeat(1, 2).to(x.dtype)

        def rotate(z):
            z1, z2 = z.chunk(2, dim=-1)
            return z * cos + torch.cat((-z2, z1), dim=-1) * sin

        y = F.scaled_dot_product_attention(rotate(q), rotate(k), v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class LlamaMLP(nn.Module):
    def __init__(self, d, ffn):
        super().__init__()
        self.gate_proj = nn.Linear(d, ffn, bias=False)
        self.up_proj = nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    def __init__(self, d, heads, ffn):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(d, eps=1e-5)
        self.self_attn = LlamaAttention(d, heads)
        self.post_attention_layernorm = nn.RMSNorm(d, eps=1e-5)
        self.mlp = LlamaMLP(d, ffn)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """Llama-7B's layout with the defaults (6.7 B parameters): build it under torch.device("meta")."""

    def __init__(self, vocab=32000, d=4096, layers=32, heads=32, ffn=11008):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(LlamaLayer(d, heads, ffn) for _ in range(layers))
        self.norm = nn.RMSNorm(d, eps=1e-5)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def tiny_gpt() -> GPT:
    return GPT(vocab=100, ctx=16, d=32, layers=2, heads=4)


def tiny_llama() -> Llama:
    return Llama(vocab=100, d=32, layers=2, heads=4, ffn=64)


# ---------------------------------------------------------------- other shapes of models


class EmbeddingBagOfWords(nn.Module):
    def __init__(self, vocab=50, d=8, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.out = nn.Linear(d, classes)

    def forward(self, ids):
        return self.out(self.emb(ids).mean(dim=1))


class Attention(nn.Module):
    def __init__(self, d=16, heads=4):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        y, _ = self.attn(x, x, x, need_weights=False)
        return self.norm(x + y)


Pair = collections.namedtuple("Pair", "logits features")


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    extras: dict


class Heads(nn.Module):
    """Submodules that return a tuple, a dict, a namedtuple and a dataclass."""

    def __init__(self):
        super().__init__()
        self.split = Splitter()
        self.named = Named()
        self.body = nn.Linear(8, 8)

    def forward(self, x):
        a, b = self.split(x)
        pair = self.named({"a": a, "b": b})
        return Output(logits=self.body(pair.logits), extras={"features": pair.features, "both": (a, b)})


class Splitter(nn.Module):
    def forward(self, x):
        return x[:, :8], x[:, 8:]


class Named(nn.Module):
    def forward(self, d):
        return Pair(logits=d["a"] * 2, features=torch.cat([d["a"], d["b"]], dim=1))


# name: (builder, input shape, token ids?)
ZOO = {
    "net": (Net, (1, 1, 32, 32), False),
    "mlp": (mlp, (4, 20), False),
    "cnn": (SmallCNN, (2, 3, 32, 32), False),
    "resnet": (lambda: ResNet(blocks=(1, 1, 1, 1), width=8, classes=10), (2, 3, 64, 64), False),
    "gpt": (tiny_gpt, (2, 16), True),
    "llama": (tiny_llama, (2, 8), True),
    "bag": (EmbeddingBagOfWords, (3, 7), True),
    "attention": (Attention, (2, 5, 16), False),
    "heads": (Heads, (2, 12), False),
}


def llama_params(vocab=32000, d=4096, layers=32, ffn=11008) -> int:
    return vocab * d * 2 + layers * (4 * d * d + 3 * d * ffn + 2 * d) + d




# ---------------------------------------------------------------- models other tools stumble on (torchinfo's
# failing cases among them) and the families of layers a real-world model brings


def lazy_mlp() -> nn.Module:
    """Uninitialized until its first forward: in_features comes from the input."""
    return nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.LazyLinear(2))


def lazy_cnn() -> nn.Module:
    return nn.Sequential(nn.LazyConv2d(4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))


class PartlyScripted(nn.Module):
    """A scripted layer inside a plain module (torchinfo's PartialJITModel)."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.jit.script(nn.Linear(8, 16))
        self.fc2 = nn.Linear(16, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def pruned_mlp() -> nn.Module:
    """torch.nn.utils.prune: fc.weight becomes weight_orig (the parameter) times weight_mask (a buffer)."""
    from torch.nn.utils import prune

    model = mlp((8, 16, 2))
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    return model


class TensorKernelSize(nn.Module):
    """kernel_size kept as a 0-d tensor attribute (transformers' EncodecConv1d and MimiConv1d do)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 4, kernel_size=3, padding=1)
        self.kernel_size = torch.tensor(3)

    def forward(self, x):
        return self.conv(x)


class Masked(nn.Module):
    """Two positional inputs, the second optional: `%shapes masked (x, mask)`."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 4)

    def forward(self, x, mask=None):
        y = self.proj(x)
        return y if mask is None else y * mask


class GaussianHead(nn.Module):
    """Returns a torch.distributions object, not a tensor."""

    def __init__(self):
        super().__init__()
        self.mu = nn.Linear(8, 2)
        self.scale = nn.Linear(8, 2)

    def forward(self, x):
        return torch.distributions.Normal(self.mu(x), F.softplus(self.scale(x)) + 1e-3)


class ScalarInput(nn.Module):
    """Takes a 0-d tensor (a temperature, a timestep)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(1, 5)

    def forward(self, t):
        return self.fc(t.reshape(1, 1))


def grouped_conv() -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Conv2d(8, 8, 3, groups=8), nn.ReLU())


class OffsetPositions(nn.Embedding):
    """A learned positional embedding that looks up positions + 2, not its input (BART, mBART, OPT)."""

    def __init__(self, positions, d):
        super().__init__(positions + 2, d)

    def forward(self, ids):
        return super().forward(torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1) + 2)


class OffsetDecoder(nn.Module):
    def __init__(self, vocab=100, positions=8, d=16):
        super().__init__()
        self.tokens = nn.Embedding(vocab, d)
        self.positions = OffsetPositions(positions, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        return self.head(self.tokens(ids) + self.positions(ids))


class GroupedExperts(nn.Module):
    """A mixture-of-experts layer as transformers runs it: tokens sorted by expert, one grouped matmul."""

    def __init__(self, d=8, experts=4, hidden=16):
        super().__init__()
        self.router = nn.Linear(d, experts)
        self.up = nn.Parameter(torch.randn(experts, d, hidden) / d**0.5)
        self.down = nn.Parameter(torch.randn(experts, hidden, d) / hidden**0.5)

    def forward(self, x):
        tokens = x.reshape(-1, x.shape[-1])
        expert = self.router(tokens).argmax(-1)
        order = expert.argsort()
        counts = torch.histc(expert.float(), bins=self.up.shape[0], min=0, max=self.up.shape[0] - 1)
        offsets = counts.cumsum(0).to(torch.int32)
        h = F.silu(torch._grouped_mm(tokens[order], self.up, offs=offsets))
        out = torch._grouped_mm(h, self.down, offs=offsets)
        return out[order.argsort()].reshape(x.shape)
