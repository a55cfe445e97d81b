package ai.mobilevlm.core;

/**
 * The text around the image for one question, as manifest["prompt"] describes it: the tokens before
 * the image (BOS first when add_bos), the image's tokens, then after_image with the prompt slot
 * replaced by the question. The whole prompt must fit the context the artifact was exported with.
 */
public final class Prompt {
    public final String question;
    /** Text before the image, without BOS (engines that tokenize add BOS themselves: bosCount). */
    public final String beforeText;
    /** Token ids before the image, BOS included (manifest before_image_ids). */
    public final int[] beforeIds;
    public final String afterText;
    /** Token ids of afterText, or null when no tokenizer was given. */
    public final int[] afterIds;
    /** before + image + after tokens, or -1 when afterIds is unknown. */
    public final int promptTokens;
    public final int contextLength;

    private Prompt(String question, String beforeText, int[] beforeIds, String afterText, int[] afterIds, int promptTokens, int contextLength) {
        this.question = question;
        this.beforeText = beforeText;
        this.beforeIds = beforeIds;
        this.afterText = afterText;
        this.afterIds = afterIds;
        this.promptTokens = promptTokens;
        this.contextLength = contextLength;
    }

    /** Checks the question (as {@code mobilevlm.processing.check_prompt}) and renders the template. */
    public static Prompt build(Manifest.PromptSpec spec, String question, Tokenizer tokenizer) throws BundleException {
        if (question == null || question.trim().isEmpty()) {
            throw new BundleException("prompt is empty");
        }
        for (int i = 0; i < question.length(); i++) {
            char c = question.charAt(i);
            if (Character.isHighSurrogate(c) && (i + 1 >= question.length() || !Character.isLowSurrogate(question.charAt(i + 1)))) {
                throw new BundleException("prompt is not valid UTF-8 (character " + i + ")");
            }
            if (Character.isLowSurrogate(c) && (i == 0 || !Character.isHighSurrogate(question.charAt(i - 1)))) {
                throw new BundleException("prompt is not valid UTF-8 (character " + i + ")");
            }
        }
        String before = spec.beforeImage.replace(spec.slot, question);
        String after = spec.afterImage.replace(spec.slot, question);
        int[] afterIds = null;
        int total = -1;
        if (tokenizer != null) {
            afterIds = tokenizer.encode(after);
            total = spec.beforeImageIds.length + spec.imageTokens + afterIds.length;
            if (total >= spec.contextLength) {
                throw new BundleException("prompt takes " + total + " tokens (image included); the artifact was exported with a context of "
                        + spec.contextLength);
            }
        }
        return new Prompt(question, before, spec.beforeImageIds, after, afterIds, total, spec.contextLength);
    }

    /** The runner's total sequence length for this prompt plus {@code maxNewTokens} answer tokens. */
    public int seqLen(int maxNewTokens) {
        if (promptTokens < 0) {
            return contextLength;
        }
        return Math.min(contextLength, promptTokens + maxNewTokens);
    }
}
