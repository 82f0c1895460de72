"""The transformers config of an exported megaloop model (`MegaloopConfig`, model_type
`megaloop`). An export writes this file unchanged as `configuration_megaloop.py`: it imports
nothing but transformers, so a user without megaloop can load the model
(`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`).

The fields of megaloop's `ModelConfig` (model.* of a run config) are attributes of their own
names, except `recurrences`: `trained_recurrences` is the r the model was trained with (the
Hyperloop and lanes variants hold parameters for exactly that many), and `recurrences` is the r a
forward pass and `generate` run when they are not told (default: the trained r). So
`from_pretrained(folder, trust_remote_code=True, recurrences=8)` (and lm-eval's
`--model_args ...,recurrences=8`) runs 8 recurrences.

Test-time compute, also per call of forward and generate:
- `kv_budget`: keep the keys and values of the last k recurrences only: recurrence i reads and
  writes cache slot i mod k (the iso-depth paper's code); None keeps all of them.
- `early_exit`: "none", "latent" (stop a token's recurrences once its state changes by less than
  `early_exit_threshold` relative to its size) or "kl" (once the KL divergence between the output
  distributions of two recurrences in a row is below the threshold, Huginn's criteria). It acts
  in decoding, one token at a time; a prompt runs every recurrence.
"""

from transformers import PretrainedConfig

EARLY_EXIT_CRITERIA = ("none", "latent", "kl")


class MegaloopConfig(PretrainedConfig):
    model_type = "megaloop"
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "n_heads",
                     "max_position_embeddings": "max_seq_len"}
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, trained_recurrences: int = 1, recurrences: int | None = None,
                 kv_budget: int | None = None, early_exit: str = "none",
                 early_exit_threshold: float = 0.0, **kwargs):
        self.trained_recurrences = trained_recurrences
        self.recurrences = trained_recurrences if recurrences is None else recurrences
        self.kv_budget = kv_budget
        if early_exit not in EARLY_EXIT_CRITERIA:
            raise ValueError(f"early_exit = {early_exit!r}: choose one of {EARLY_EXIT_CRITERIA}")
        self.early_exit = early_exit
        self.early_exit_threshold = early_exit_threshold
        kwargs.setdefault("tie_word_embeddings", False)  # a tied model has no lm_head to tie
        super().__init__(**kwargs)
