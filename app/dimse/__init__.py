"""DICOM networking (DIMSE over TCP, pynetdicom): the receiver (C-STORE/C-ECHO SCP), the sender
(C-STORE SCU), query/retrieve (C-FIND/C-GET) and their shared pieces (TLS, AE titles, TCP_NODELAY).

Not MONAI Deploy operators: the node and batch processing use them around the pipeline.
"""
