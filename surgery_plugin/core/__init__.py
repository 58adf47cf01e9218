"""The method itself, as computations on a model's weights and hidden states; imports nothing above it.

| module | step |
|---|---|
| ``architectures`` | where each family keeps its layers and its MLP gate |
| ``features`` | pooled hidden states and gate inputs from one forward pass |
| ``probe`` | step 1: the behavior probe (train, save, load) |
| ``reference`` | statistics of benign text the variants beyond the paper use |
| ``regions`` | step 2: which gate rows to edit |
| ``edit`` | step 3: the edit (execute / apply / revert) |
| ``streaming`` | the same selection read from checkpoint shards |
| ``statistics``, ``batching``, ``provenance``, ``dtypes`` | what the steps share |
"""
