"""``pneumotriage listen``: a DICOM node at the PACS that receives studies, triages each once it is complete and
sends the results back (the optional extra ``pneumotriage[pacs]``).

- :mod:`.node`: the storage SCP (C-ECHO, C-STORE of radiographs; allow-lists, association and disk limits);
- :mod:`.inbox`: every instance on disk before it is acknowledged, and each study's state;
- :mod:`.service`: the loop that triages complete studies with warm models, sends results and keeps the worklist;
- :mod:`.sender`: the results to a destination, by C-STORE or STOW-RS.
"""

from pneumotriage.listen.node import NodeOptions
from pneumotriage.listen.sender import Destination, StowDestination
from pneumotriage.listen.service import Listener, ListenOptions

__all__ = ["Destination", "ListenOptions", "Listener", "NodeOptions", "StowDestination"]
