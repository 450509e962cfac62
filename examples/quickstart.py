"""The README's quickstart, runnable as it stands: L_orth on a small CNN trained on scikit-learn's digits.

    python examples/quickstart.py
"""

import torch
from sklearn.datasets import load_digits

import orthofx

torch.manual_seed(0)                                                  # same weights and batches every run
digits = load_digits()
x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # 1797 x 1 x 8 x 8
y = torch.tensor(digits.target)

model = orthofx.models.get("small_cnn")
print(orthofx.explain(model, "lorth", example_inputs=(x[:8],)))      # dry run: which rule hits which site

gm = orthofx.transform(model, "lorth", example_inputs=(x[:8],))       # a torch.fx.GraphModule
optimizer = torch.optim.Adam(gm.parameters(), lr=3e-3)
criterion = torch.nn.CrossEntropyLoss()
for step in range(100):
    index = torch.randint(0, len(x), (64,))
    loss = criterion(gm(x[index]), y[index]) + orthofx.penalty(gm)   # task loss + weighted L_orth
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

print(orthofx.report(gm))                                             # L_orth and exact sigma per layer
