"""The fit report: a study read back from storage as figures and one offline HTML page.

``studies`` opens storage read-only and lists studies, ``figures`` draws the PNGs with
matplotlib, ``page`` writes ``report.html``, ``cli`` is ``simcal report`` and ``simcal
studies``, ``live`` regenerates the report in the background for the driver's HTTP server
(``simcal.webapp``).
"""
