/*
 * rcmseg: export the annotations of every image in the open QuPath project as GeoJSON.
 *
 * Written for QuPath 0.4 to 0.7 (scripting API: getProject, ProjectImageEntry.readImageData,
 * exportObjectsToGeoJson with the FEATURE_COLLECTION option, all present since 0.4). Not run on
 * rcmseg's CI, which has no QuPath; the files it writes are what `rcmseg labels import` reads.
 *
 * Use: Automate > Script editor, open this file, Run (once: it loops over the whole project; do
 * not use "Run for project"). Save the open image first: the script reads the saved data.
 *
 * Writes <project folder>/rcmseg_annotations/<image name without extension>.geojson, one
 * FeatureCollection per image with annotations (coordinates in full-resolution pixels). Then:
 *
 *     rcmseg labels import MOSAICS --annotations <project folder>/rcmseg_annotations --out DATASET
 *
 * Only annotations are exported; detections, cells and tiles are left out here (rcmseg would
 * ignore them anyway). Unclassified annotations are exported but rcmseg leaves them unlabelled.
 */

import qupath.lib.common.GeneralTools

def outDir = buildFilePath(PROJECT_BASE_DIR, 'rcmseg_annotations')
mkdirs(outDir)

def project = getProject()
if (project == null) {
    println 'Open a project first'
    return
}

int written = 0
for (entry in project.getImageList()) {
    def imageData = entry.readImageData()
    def annotations = imageData.getHierarchy().getAnnotationObjects()
    def name = GeneralTools.stripExtension(entry.getImageName())
    if (annotations.isEmpty()) {
        println "${name}: no annotations, skipped"
        continue
    }
    def path = buildFilePath(outDir, name + '.geojson')
    exportObjectsToGeoJson(annotations, path, 'FEATURE_COLLECTION')
    println "${name}: ${annotations.size()} annotations -> ${path}"
    written++
}
println "Done: ${written} GeoJSON files in ${outDir}"
