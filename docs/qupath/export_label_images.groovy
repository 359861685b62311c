/*
 * rcmseg: export every image's annotations in the open QuPath project as an indexed label image.
 *
 * Written for QuPath 0.4 to 0.7 (LabeledImageServer.Builder, writeImage; both since 0.2).
 * Not run on rcmseg's CI, which has no QuPath. Prefer export_annotations.groovy (GeoJSON: exact
 * outlines, rcmseg's overlap rule); use this route where a lab already works with label images.
 *
 * Use: Automate > Script editor, open this file, Run (once: it loops over the whole project).
 *
 * Writes <project folder>/rcmseg_label_images/<image name without extension>.png: one channel,
 * pixel value = rcmseg class index (background 0, artifact 1, meshwork 2, nested 3, ring 4,
 * aspecific 5), 255 where nothing is annotated, downsampled by DOWNSAMPLE. Then:
 *
 *     rcmseg labels import MOSAICS --annotations <project folder>/rcmseg_label_images \
 *         --out DATASET --format image
 *
 * rcmseg upsamples by nearest neighbour; DOWNSAMPLE must be an integer (1 = full resolution, the
 * exact choice; 4 = rcmseg's working resolution of 2 um/px for 0.5 um/px mosaics). Where
 * annotations overlap, QuPath paints the labels in the order added below (a later label wins),
 * not rcmseg's "smaller wins" rule. Only area annotations are drawn (lines and points would be
 * painted as thin strokes otherwise).
 */

import qupath.lib.common.ColorTools
import qupath.lib.common.GeneralTools
import qupath.lib.images.servers.LabeledImageServer

double DOWNSAMPLE = 4.0
def CLASSES = ['background', 'artifact', 'meshwork', 'nested', 'ring', 'aspecific']

def outDir = buildFilePath(PROJECT_BASE_DIR, 'rcmseg_label_images')
mkdirs(outDir)

def project = getProject()
if (project == null) {
    println 'Open a project first'
    return
}

for (entry in project.getImageList()) {
    def imageData = entry.readImageData()
    def name = GeneralTools.stripExtension(entry.getImageName())
    if (imageData.getHierarchy().getAnnotationObjects().isEmpty()) {
        println "${name}: no annotations, skipped"
        continue
    }
    // Class names as used in the project: match rcmseg's names ignoring case.
    def projectClasses = imageData.getHierarchy().getAnnotationObjects()
            .findResults { it.getPathClass()?.toString() }.unique()
    def builder = new LabeledImageServer.Builder(imageData)
            .backgroundLabel(255, ColorTools.WHITE)   // unlabelled = 255, as rcmseg stores it
            .downsample(DOWNSAMPLE)
            .useFilter({ it.isAnnotation() && it.hasROI() && it.getROI().isArea() })
            .multichannelOutput(false)                // one channel of label values
    CLASSES.eachWithIndex { className, index ->
        projectClasses.findAll { it.equalsIgnoreCase(className) }.each { builder.addLabel(it, index) }
    }
    def server = builder.build()
    def path = buildFilePath(outDir, name + '.png')
    writeImage(server, path)
    println "${name}: ${server.getWidth()}x${server.getHeight()} px -> ${path}"
}
println "Done: label images in ${outDir}"
