"""CDS Hooks 2.0.1 service: discovery, patient-view / order-select / order-sign, feedback.

The cards come from the same rule engine as the stream (``rules.engine.evaluate``) on facts normalised from
the request's prefetch (or the EHR's FHIR server), merged with the patient's stored alerts.
"""
