"""robint_ray: robust vs standard models, interpreted at scale on Ray.

Reproduces and scales Boychev (2023), "Interpretable Computer Vision Models through Adversarial
Training": PGD adversarial training, Integrated Gradients and SHAP expected gradients, representation
inversion, class-specific generation, feature visualisation, and FID, with Ray at the edges.
"""

__version__ = "0.1.0"
