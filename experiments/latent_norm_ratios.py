"""Largest latent norm / median norm ratios on clean models (data behind the spot detector threshold).

    python experiments/latent_norm_ratios.py
"""
import torch, numpy as np
from vaeprobe.vae import load_vae
from vaeprobe.images import load_images
torch.set_num_threads(2)
for spec in ["builtin:mini-kl-f8","builtin:tiny-random"]:
    vae = load_vae(spec)
    for size in [128, 256]:
        b = load_images("builtin:photos", factor=8, size=size)
        mx=[]; allr=[]; lv=[]
        for img in b:
            p = vae.encode(img.tensor())
            n = p.mean[0].norm(dim=0); r = n/n.median()
            mx.append(float(r.max())); allr.append(r.flatten().numpy())
            lv.append(float(p.raw_logvar.min()))
        allr=np.concatenate(allr)
        print(spec,size,"max per image",np.round(sorted(mx),2),"pos q99.9",np.quantile(allr,0.999).round(2),"min raw logvar",round(min(lv),1))
