"""Hospital integration: results as DICOM objects (``results``), a DICOMweb client for a PACS (``client``),
and the ``cxrnn pacs`` runs over it (``watch``)."""
