import sys, time, torch, logging
from fsmooth.models.zoo import pretrained
from fsmooth.data import load_dataset
from fsmooth.defense import DefendedClassifier, DefenseConfig
torch.manual_seed(0)
which, n = sys.argv[1], int(sys.argv[2])
model = pretrained("wrn-16-1-cifar10-jpeg-fs36").eval()
x, y = load_dataset("../shared/datasets/cifar10-jpeg-q75.tar.gz", "test")
x = x[:n].float() / 255; y = y[:n]
d = DefendedClassifier(model, DefenseConfig.for_model(model), 1).eval()
t0 = time.time()
if which == "square":
    from pyautoattack.square import SquareAttack
    a = SquareAttack(d, p_init=0.8, n_queries=5000, eps=8/255, norm="Linf", n_restarts=1, seed=0, verbose=True, device="cpu")
    a.perturb(x, y)
else:
    from pyautoattack.fab_pt import FABAttack_PT
    a = FABAttack_PT(d, n_restarts=1, n_iter=100, eps=8/255, seed=0, norm="Linf", verbose=True, device="cpu", targeted=True, n_target_classes=9)
    a.perturb(x, y)
print("wall", time.time() - t0, flush=True)
