/** @type {AppTypes.Config} */
// OHIF v3 app configuration for the viewer check (tests/test_viewer_ohif.py, `make viewer-test`).
//
// One data source: Orthanc's DICOMweb plugin (Debian orthanc-dicomweb 1.7, root /dicom-web/) on
// loopback. The test's server (tests/viewer_server.py) serves this app and forwards /dicom-web/ to
// Orthanc's DICOMweb root on 127.0.0.1, so the data source is the page's own origin: Orthanc 1.10
// sends no CORS headers, and the ports are picked free at run time. Based on OHIF's
// platform/app/public/config/local_orthanc.js, without the upload/local-file sources.
const dicomWebRoot = `${window.location.origin}/dicom-web`;

window.config = {
  name: 'hyperct-viewer-check',
  routerBasename: '/',
  extensions: [],
  modes: [],
  // No first-visit tour (shepherd.js): it covers the viewport and intercepts clicks.
  customizationService: { 'ohif.tours': { $set: [] } },
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showLoadingIndicator: true,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: { option: 'never' },
  maxNumRequests: { interaction: 100, thumbnail: 5, prefetch: 10 },
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc DICOMweb (loopback)',
        name: 'orthanc',
        wadoUriRoot: dicomWebRoot,
        qidoRoot: dicomWebRoot,
        wadoRoot: dicomWebRoot,
        qidoSupportsIncludeField: false,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        dicomUploadEnabled: false,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true },
      },
    },
  ],
};
