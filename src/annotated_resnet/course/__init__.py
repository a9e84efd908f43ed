"""Helpers that exist for the notebooks: measurements of trained and untrained networks
(:mod:`.probes`), the reference runs read as the paper's figures (:mod:`.analysis`), the
figures of the paper drawn from the networks (:mod:`.diagrams`, :mod:`.network_diagram`), the
ILSVRC results (:mod:`.ilsvrc`), the ImageNet recipe (:mod:`.imagenet_recipe`) and the
notebooks' run scale (:mod:`.scale`). They may use :mod:`annotated_resnet.training`; training
never uses them."""
