"""corral's endpoint picker for the Gateway API Inference Extension (``corral picker``).

``bodies`` finds the model in a streamed request body, ``view`` reads each pod's
``/admin/status``, ``decide`` picks pods for a model (pure), ``discovery`` names the pods (a
static list or a Service's EndpointSlices), ``picker.Picker`` holds it together.
"""
