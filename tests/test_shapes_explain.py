"""Shape errors explained: the failing module, what it received, what it expected, the fix, the
same in real, fake and meta mode."""
import pytest
import torch
import zoo
from snapshot import diff, snapshot
from torch import nn

MODES = ["real", "fake", "meta"]


def failure(shell, model, line, mode):
    shell.ns["model"] = model
    before = snapshot(model)
    t = shell.run(f"%shapes model {line} --mode {mode}")
    assert not t.ok
    assert diff(before, snapshot(model)) == []
    return t.failure


@pytest.mark.parametrize("mode", MODES)
def test_notes_linear_names_the_flatten(notes, mode):
    notes.run("net.fc1 = nn.Linear(1344, 10)")
    t = notes.run(f"%shapes net 1,1,32,32 --mode {mode}")
    assert t.failure.module == "fc1" and t.failure.cls == "Linear"
    assert t.failure.message == (
        "fc1 (Linear) expects in_features=1344 but received [1, 1350]; 1350 comes from flattening "
        "conv1 → max_pool2d output [1, 6, 15, 15] (6 × 15 × 15 = 1350); use nn.Linear(1350, 10) or nn.LazyLinear(10); "
        "or change the input so that 1344 features reach it")
    # the ops that change a shape are rows in every mode (fake and meta record them when explaining)
    assert [r.name for r in t.rows] == ["net", "conv1", "max_pool2d", "view", "fc1"]
    text = notes.text(t)
    assert "why: fc1 (Linear) expects in_features=1344" in text and "fix: use nn.Linear(1350, 10)" in text
    assert "fix: use nn.Linear(1350, 10)" in notes.html(t)


def test_linear_fed_by_a_module(shell):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(6, 2))
    f = failure(shell, model, "3,4", "real")
    assert f.module == "2" and f.message == ("2 (Linear) expects in_features=6 but received [3, 8]; 8 is the last size "
                                             "of 1's output [3, 8]; use nn.Linear(8, 2) or nn.LazyLinear(2); "
                                             "or change the input so that 6 features reach it")


def test_linear_fix_names_the_input_it_was_built_for(notes):
    """The notes' net fed MNIST's 28x28: the fix says what the model was built for, not only how to change it."""
    t = notes.run("%shapes net 1,1,28,28")
    assert t.failure.fix == ("use nn.Linear(1014, 10) or nn.LazyLinear(10); or give the model the input size it was "
                             "built for (it expects 6 × 15 × 15 = 1350 here, not 6 × 13 × 13)")


@pytest.mark.parametrize("mode", MODES)
def test_conv_channels(shell, mode):
    f = failure(shell, nn.Sequential(nn.Conv2d(3, 8, 3)), "1,1,28,28", mode)
    assert f.explanation == ("0 (Conv2d) expects in_channels=3 at dim 1 [batch, channels, height, width] but received "
                             "[1, 1, 28, 28] with 1 (a grayscale image into an RGB network?)")
    assert f.fix == "repeat the channel, e.g. x.expand(-1, 3, -1, -1), or use nn.Conv2d(1, 8, 3) or nn.LazyConv2d(8, 3)"
    # the other way round, as in the notes: an RGB image into the grayscale net; the fix may change the input
    f = failure(shell, zoo.Net(), "1,3,32,32", mode)
    assert f.explanation.endswith("with 3 (an RGB image into a grayscale network?)")
    assert f.fix == ("convert the input to one channel, e.g. x.mean(dim=1, keepdim=True), "
                     "or use nn.Conv2d(3, 6, 3) or nn.LazyConv2d(6, 3)")
    f = failure(shell, nn.Conv2d(4, 8, 3), "1,2,9,9", mode)
    assert f.fix == "give the input 4 channels, or use nn.Conv2d(2, 8, 3) or nn.LazyConv2d(8, 3)"


def test_conv_channels_last(shell):
    f = failure(shell, nn.Conv2d(3, 8, 3), "2,32,32,3", "fake")
    assert "(the channels look last)" in f.explanation and f.fix == "put channels first: x.permute(0, 3, 1, 2)"


@pytest.mark.parametrize("mode", MODES)
def test_conv_rank(shell, mode):
    f = failure(shell, nn.Conv2d(1, 4, 3), "28,28", mode)
    assert f.explanation.startswith("model (Conv2d) expects a 4-d input [batch, channels, height, width] "
                                    "(or 3-d without batch) but received 2-d [28, 28]")
    assert f.fix == "add the missing dims, e.g. x.reshape(1, 1, 28, 28)"
    f1 = failure(shell, nn.Conv1d(2, 4, 3), "1,2,8,8,8", mode)
    assert "expects a 3-d input [batch, channels, length]" in f1.explanation


@pytest.mark.parametrize("mode", MODES)
def test_conv_kernel_larger_than_input(shell, mode):
    model = nn.Sequential(nn.Conv3d(1, 2, 3), nn.MaxPool3d(2), nn.Conv3d(2, 2, 5))
    f = failure(shell, model, "1,1,8,8,8", mode)
    assert f.module == "2"
    assert f.explanation == ("2 (Conv3d) has a 5×5×5 kernel but its input [1, 2, 3, 3, 3] is only 3×3×3; "
                             "earlier layers shrank it (1 gave [1, 2, 3, 3, 3])")
    assert "padding" in f.fix


@pytest.mark.parametrize("mode", MODES)
def test_batchnorm(shell, mode):
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(16))
    f = failure(shell, model, "2,3,8,8", mode)
    assert f.message == ("1 (BatchNorm2d) expects num_features=16 channels at dim 1 but received [2, 6, 6, 6] "
                         "with 6; use nn.BatchNorm2d(6)")
    bn = failure(shell, nn.BatchNorm1d(4), "2,4,3,3", mode)
    assert "expects a 2-d or 3-d input" in bn.explanation


def test_batchnorm_batch_of_one_in_train_mode(shell):
    f = failure(shell, nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), "1,3", "real")
    assert "train mode" in f.explanation and f.fix == "use a batch larger than 1, or call model.eval() first"


@pytest.mark.parametrize("mode", MODES)
def test_layernorm(shell, mode):
    f = failure(shell, nn.Sequential(nn.Linear(4, 10), nn.LayerNorm(8)), "2,4", mode)
    assert f.message == ("1 (LayerNorm) expects the last 1 size(s) [8] (normalized_shape) but received [2, 10]; "
                         "use nn.LayerNorm(10)")


@pytest.mark.parametrize("mode", MODES)
def test_embedding_float_ids(shell, mode):
    shell.run("import torch; x = torch.rand(2, 5)")
    f = failure(shell, zoo.EmbeddingBagOfWords(), "x", mode)
    assert f.explanation == "emb (Embedding) looks up integer token ids but received float32 values [2, 5]"
    assert f.fix.startswith("pass integer ids, e.g. ids.long()")


@pytest.mark.parametrize("mode", MODES)
def test_embedding_id_out_of_range(shell, mode):
    shell.run("import torch; ids = torch.tensor([[1, 2, 70]])")
    f = failure(shell, zoo.EmbeddingBagOfWords(vocab=50), "ids", mode)
    assert f.module == "emb"
    assert f.explanation.startswith("emb (Embedding) has num_embeddings=50, so ids must be 0..49, "
                                    "but received an id outside that")
    assert f.fix == "make num_embeddings your vocabulary size (nn.Embedding(vocab_size, 8)) or check the tokenizer"
    if mode == "real":
        assert "(largest id 70, smallest 1)" in f.explanation


@pytest.mark.parametrize("mode", MODES)
def test_multihead_attention_embed_dim(shell, mode):
    f = failure(shell, zoo.Attention(d=16, heads=4), "2,5,12", mode)
    assert f.module == "attn"
    assert f.message == ("attn (MultiheadAttention) expects embed_dim=16 as the last size of the query "
                         "[batch, seq, embed] but received [2, 5, 12]; use nn.MultiheadAttention(12, 4) "
                         "or project the input to 16 first")


class Custom(nn.Module):
    def forward(self, x):
        return torch.cat([x, x[:, :1, :2]], dim=1)


@pytest.mark.parametrize("mode", MODES)
def test_generic_fallback(shell, mode):
    model = nn.Sequential(nn.Identity(), Custom())
    f = failure(shell, model, "2,3,4", mode)
    assert f.lines()[0] == "cat (op) in 1 (Custom) failed on input [[2, 3, 4], [2, 1, 2]]"
    assert "Sizes of tensors must match" in f.error
    assert f.explanation == "" and f.fix == ""
    gru = failure(shell, nn.GRU(4, 8), "2,3,5", mode)
    assert (gru.module, gru.cls, gru.inputs, gru.explanation) == ("model", "GRU", "[2, 3, 5]", "")
    assert "input_size" in gru.error and gru.lines()[0] == "model (GRU) failed on input [2, 3, 5]"


def test_dtype_mismatch(shell):
    shell.run("import torch; x = torch.ones(2, 4, dtype=torch.long)")
    f = failure(shell, nn.Linear(4, 2), "x", "real")
    assert f.explanation == "model's weights are float32 but its input is integers"
    assert f.fix == "convert the input to floats: x.float()"


def test_view_in_forward_explained(shell):
    class BadView(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return self.conv(x).view(1, 100)

    f = failure(shell, BadView(), "1,1,8,8", "fake")
    assert (f.module, f.cls, f.inputs) == ("view", "op", "[1, 2, 6, 6], 1, 100")
    assert f.explanation == "view asks for a shape that does not hold the 72 elements of [1, 2, 6, 6]"
    assert f.fix == "keep the batch size and let torch compute the rest: x.view(x.size(0), -1)"
